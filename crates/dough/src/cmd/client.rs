//! The CLI client of `dough serve`: `submit`, `ls`, `show`, `logs [-f]`,
//! `cancel`. It finds the server and its token in the state dir
//! (`api-url`, `api-token`) or in `DOUGH_URL` / `DOUGH_TOKEN`.
use std::io::{BufRead, Write};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use crate::Cli;

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub memory: u32,
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// The image to boot (the daemon's `dough image ls`) [default: default].
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,
    /// An agent preset of the daemon's (`dough agents` on its host): its
    /// image, command, secrets, allowlist and resources, each unless given.
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// With --agent: the model API's address; the allowlist follows it.
    #[arg(long, value_name = "URL", requires = "agent")]
    pub model_url: Option<String>,
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    #[arg(long = "label", short = 'l', value_name = "K=V")]
    pub labels: Vec<String>,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    #[arg(long)]
    pub root: bool,
    #[arg(long, value_name = "MODE")]
    pub egress: Option<String>,
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_host: Vec<String>,
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    pub allow_cidr: Vec<String>,
    /// Follow the task's output until it ends; exit with its exit code.
    #[arg(long, short = 'w')]
    pub wait: bool,
    /// As for `dough run`; `--secret-env` names variables of the *daemon's*
    /// environment (only names are sent and stored).
    #[command(flatten)]
    pub repo: super::run::RepoArgs,
    #[arg(last = true, required_unless_present = "agent", value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Show the warm pools instead of tasks.
    #[arg(long, conflicts_with = "state")]
    pub pools: bool,
    /// Only tasks in this state.
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    pub id: String,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Keep printing output as it comes, until the task ends.
    #[arg(short, long)]
    pub follow: bool,
    pub id: String,
}

pub struct Client {
    url: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn from_env(cli: &Cli) -> anyhow::Result<Client> {
        let dir = cli
            .state_dir
            .clone()
            .unwrap_or_else(|| dough_core::config::DEFAULT_STATE_DIR.into());
        let read =
            |name: &str| std::fs::read_to_string(dir.join(name)).map(|s| s.trim().to_string());
        let url = match std::env::var("DOUGH_URL") {
            Ok(u) => u,
            Err(_) => read("api-url").with_context(|| {
                format!(
                    "no DOUGH_URL and no {}/api-url: is `dough serve` running?",
                    dir.display()
                )
            })?,
        };
        let token = match std::env::var("DOUGH_TOKEN") {
            Ok(t) => t,
            Err(_) => read("api-token")
                .with_context(|| format!("no DOUGH_TOKEN and no {}/api-token", dir.display()))?,
        };
        Ok(Client {
            url: url.trim_end_matches('/').to_string(),
            token,
            agent: ureq::AgentBuilder::new().build(),
        })
    }

    fn req(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.url))
            .set("Authorization", &format!("Bearer {}", self.token))
    }

    fn call(&self, r: Result<ureq::Response, ureq::Error>) -> anyhow::Result<ureq::Response> {
        match r {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r.into_json().unwrap_or(Value::Null);
                let msg = body["error"]["message"].as_str().unwrap_or("(no message)");
                bail!("the server said {code}: {msg}")
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot reach {}", self.url))),
        }
    }

    pub fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.call(self.req("GET", path).call())?.into_json()?)
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.call(self.req("DELETE", path).call())?;
        Ok(())
    }
}

fn kv(v: &[String], what: &str) -> anyhow::Result<serde_json::Map<String, Value>> {
    v.iter()
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .with_context(|| format!("{what} '{s}' is not K=V"))?;
            Ok((k.to_string(), Value::String(v.to_string())))
        })
        .collect()
}

pub fn submit(cli: &Cli, a: &SubmitArgs) -> anyhow::Result<u8> {
    let c = Client::from_env(cli)?;
    let mut body = json!({
        "command": a.command,
        "env": kv(&a.env, "--env")?,
        "labels": kv(&a.labels, "--label")?,
        "vcpus": a.vcpus,
        "memory_mib": a.memory,
        "priority": a.priority,
        "root": a.root,
        "allow_hosts": a.allow_host,
        "allow_cidrs": a.allow_cidr,
    });
    if let Some(t) = a.timeout {
        body["timeout_secs"] = json!(t);
    }
    if let Some(e) = &a.egress {
        body["egress"] = json!(e);
    }
    if let Some((repo, pr)) = a.repo.request() {
        body["repo"] = serde_json::to_value(repo)?;
        body["pull_request"] = serde_json::to_value(pr)?;
    }
    if let Some(p) = a.repo.prompt_text()? {
        body["prompt"] = json!(p);
    }
    if !a.repo.secret_env.is_empty() {
        body["secret_env"] = json!(a.repo.secret_env);
    }
    if let Some(i) = &a.image {
        body["image"] = json!(i);
    }
    if let Some(g) = &a.agent {
        body["agent"] = json!(g);
    }
    if let Some(u) = &a.model_url {
        body["model_url"] = json!(u);
    }
    let r: Value = c
        .call(c.req("POST", "/v1/tasks").send_json(body))?
        .into_json()?;
    let id = r["id"].as_str().context("no id in the answer")?.to_string();
    if !a.wait {
        println!("{id}");
        return Ok(0);
    }
    eprintln!("dough: task {id}");
    follow(&c, &id, 0)?;
    let t = c.get_json(&format!("/v1/tasks/{id}"))?;
    if a.repo.json {
        println!("{t}");
    } else if let Some(u) = t["result"]["pr_url"].as_str() {
        println!("{u}");
    } else if let Some(n) = t["result"]["note"].as_str() {
        eprintln!("dough: {n}");
    }
    Ok(final_code(&t))
}

fn final_code(t: &Value) -> u8 {
    match (t["state"].as_str(), t["exit_code"].as_i64()) {
        (Some("succeeded"), _) => 0,
        (_, Some(c)) => c.clamp(1, 255) as u8,
        (Some("timed_out"), _) => 124,
        (Some("cancelled"), _) => 130,
        _ => crate::EXIT_DOUGH,
    }
}

pub fn ls(cli: &Cli, a: &LsArgs) -> anyhow::Result<u8> {
    let c = Client::from_env(cli)?;
    if a.pools {
        return ls_pools(&c, a.json);
    }
    let mut q = format!("/v1/tasks?limit={}", a.limit);
    if let Some(s) = &a.state {
        q.push_str(&format!("&state={s}"));
    }
    let v = c.get_json(&q)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    use super::table::{print, Align::*};
    let rows: Vec<Vec<String>> = v["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let cmd: Vec<&str> = t["request"]["command"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str())
                .collect();
            vec![
                t["id"].as_str().unwrap_or("").to_string(),
                t["state"].as_str().unwrap_or("").to_string(),
                t["reason"].as_str().unwrap_or("-").to_string(),
                t["exit_code"]
                    .as_i64()
                    .map(|c| c.to_string())
                    .unwrap_or("-".into()),
                cmd.join(" "),
            ]
        })
        .collect();
    print(
        &[
            ("ID", Left),
            ("STATE", Left),
            ("REASON", Left),
            ("EXIT", Right),
            ("COMMAND", Left),
        ],
        &rows,
    );
    Ok(0)
}

#[derive(Args, Debug)]
pub struct NodesArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub action: NodeAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum NodeAction {
    /// Finish the node's running tasks and give it no new ones (then stop
    /// it at leisure: it holds no task).
    Drain {
        /// The node's name (`dough nodes`).
        name: String,
    },
    /// End a drain: the node takes tasks again.
    Resume {
        /// The node's name (`dough nodes`).
        name: String,
    },
}

/// `dough node drain|resume NAME`.
pub fn node(cli: &Cli, a: &NodeArgs) -> anyhow::Result<u8> {
    let c = Client::from_env(cli)?;
    let (method, name) = match &a.action {
        NodeAction::Drain { name } => ("POST", name),
        NodeAction::Resume { name } => ("DELETE", name),
    };
    let n: Value = c
        .call(c.req(method, &format!("/v1/nodes/{name}/drain")).call())?
        .into_json()?;
    let vms = n["use"]["vms"].as_u64().unwrap_or(0);
    match n["state"].as_str() {
        Some("draining") => println!("{name} draining ({vms} VMs running; it takes no new task)"),
        Some(s) => println!("{name} {s}"),
        None => println!("{name} ?"),
    }
    Ok(0)
}

/// `dough nodes`: every node on record, its state, use against capacity
/// and the age of its last heartbeat.
pub fn nodes(cli: &Cli, a: &NodesArgs) -> anyhow::Result<u8> {
    let c = Client::from_env(cli)?;
    let v = c.get_json("/v1/nodes")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    use super::table::{print, Align::*};
    let now = v["now_ms"].as_u64().unwrap_or(0);
    let n = |v: &Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
    let rows: Vec<Vec<String>> = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|nd| {
            let (cap, used) = (&nd["capacity"], &nd["use"]);
            let beat = nd["heartbeat_ms"].as_u64().unwrap_or(0);
            let list = |v: &Value| {
                let l: Vec<&str> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str())
                    .collect();
                if l.is_empty() {
                    "-".to_string()
                } else {
                    l.join(" ")
                }
            };
            vec![
                nd["name"].as_str().unwrap_or("?").to_string(),
                nd["state"].as_str().unwrap_or("?").to_string(),
                format!("{}/{}", n(&used["vms"]), n(&cap["vms"])),
                format!("{}/{}", n(&used["vcpus"]), n(&cap["vcpus"])),
                format!("{}/{}", n(&used["memory_mib"]), n(&cap["memory_mib"])),
                format!("{:.1} s ago", now.saturating_sub(beat) as f64 / 1000.0),
                list(&cap["pools"]),
                list(&cap["images"]),
            ]
        })
        .collect();
    print(
        &[
            ("NODE", Left),
            ("STATE", Left),
            ("VMS", Right),
            ("VCPUS", Right),
            ("MEM_MIB", Right),
            ("HEARTBEAT", Right),
            ("POOLS", Left),
            ("IMAGES", Left),
        ],
        &rows,
    );
    Ok(0)
}

fn ls_pools(c: &Client, json: bool) -> anyhow::Result<u8> {
    let v = c.get_json("/v1/pools")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let pools = v["pools"].as_array().cloned().unwrap_or_default();
    if pools.is_empty() {
        println!("no warm pools (start the daemon with `dough serve --pool-size N`)");
        return Ok(0);
    }
    use super::table::{print, Align::*};
    let n = |v: &Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
    let mut rows = vec![];
    let mut errors = vec![];
    for p in &pools {
        let vms: Vec<&str> = p["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["vm_id"].as_str())
            .collect();
        rows.push(vec![
            p["image"].as_str().unwrap_or("default").to_string(),
            n(&p["vcpus"]),
            n(&p["memory_mib"]),
            n(&p["size"]),
            n(&p["idle"]),
            n(&p["booting"]),
            n(&p["claimed"]),
            n(&p["replaced"]),
            p["refill"].as_str().unwrap_or("-").to_string(),
            if vms.is_empty() {
                "-".to_string()
            } else {
                vms.join(" ")
            },
        ]);
        if let Some(e) = p["last_error"].as_str() {
            errors.push(format!(
                "{} {}x{}: last error: {e}",
                p["image"].as_str().unwrap_or("default"),
                n(&p["vcpus"]),
                n(&p["memory_mib"])
            ));
        }
    }
    print(
        &[
            ("IMAGE", Left),
            ("VCPUS", Right),
            ("MEM_MIB", Right),
            ("SIZE", Right),
            ("IDLE", Right),
            ("BOOTING", Right),
            ("CLAIMED", Right),
            ("REPLACED", Right),
            ("REFILL", Left),
            ("IDLE VMS", Left),
        ],
        &rows,
    );
    for e in errors {
        println!("{e}");
    }
    Ok(0)
}

pub fn show(cli: &Cli, a: &IdArgs) -> anyhow::Result<u8> {
    let c = Client::from_env(cli)?;
    let t = c.get_json(&format!("/v1/tasks/{}", a.id))?;
    println!("{}", serde_json::to_string_pretty(&t)?);
    Ok(0)
}

pub fn cancel(cli: &Cli, a: &IdArgs) -> anyhow::Result<u8> {
    let c = Client::from_env(cli)?;
    let t: Value = c
        .call(c.req("DELETE", &format!("/v1/tasks/{}", a.id)).call())?
        .into_json()?;
    println!("{} {}", a.id, t["state"].as_str().unwrap_or("?"));
    Ok(0)
}

pub fn logs(cli: &Cli, a: &LogsArgs) -> anyhow::Result<u8> {
    let c = Client::from_env(cli)?;
    if !a.follow {
        let mut r = c
            .call(c.req("GET", &format!("/v1/tasks/{}/logs", a.id)).call())?
            .into_reader();
        std::io::copy(&mut r, &mut std::io::stdout().lock())?;
        return Ok(0);
    }
    follow(&c, &a.id, 0)?;
    Ok(0)
}

/// Print the task's output from the event stream, stored output first
/// (`?offset=`: the daemon replays it, with each chunk's stream, then goes
/// live), until the task ends. A dropped stream is reopened from the last
/// byte printed, so nothing is printed twice or lost.
fn follow(c: &Client, id: &str, from: u64) -> anyhow::Result<()> {
    let mut seen = from;
    let mut out = std::io::stdout().lock();
    let mut failures = 0;
    loop {
        let events = match c.call(
            c.req("GET", &format!("/v1/tasks/{id}/events"))
                .query("offset", &seen.to_string())
                .call(),
        ) {
            Ok(r) => r,
            Err(e) if failures < 5 && seen > from => {
                failures += 1;
                eprintln!("dough: the event stream dropped ({e}); reopening from byte {seen}");
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut event = String::new();
        for line in std::io::BufReader::new(events.into_reader()).lines() {
            let Ok(line) = line else { break };
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(d).unwrap_or(Value::Null);
                match event.as_str() {
                    "output" => {
                        let off = v["offset"].as_u64().unwrap_or(0);
                        let data = v["data"].as_str().unwrap_or("");
                        let end = off + data.len() as u64;
                        if end > seen {
                            let skip = seen.saturating_sub(off) as usize;
                            let part = data.get(skip..).unwrap_or(data);
                            if v["stream"] == "stderr" {
                                eprint!("{part}");
                            } else {
                                out.write_all(part.as_bytes())?;
                                out.flush()?;
                            }
                            seen = end;
                            failures = 0;
                        }
                    }
                    "state" => {
                        let st = v["state"].as_str().unwrap_or("");
                        if matches!(st, "succeeded" | "failed" | "cancelled" | "timed_out") {
                            let reason = v["reason"].as_str().unwrap_or("");
                            let t = c.get_json(&format!("/v1/tasks/{id}"))?;
                            if t["output_truncated"] == true {
                                eprintln!("dough: the task's output was cut at the daemon's limit");
                            }
                            eprintln!("dough: task {id} {st} ({reason})");
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        }
        // The stream ended before the task did.
        failures += 1;
        if failures > 5 {
            anyhow::bail!("the event stream of task {id} keeps dropping (at byte {seen})");
        }
        eprintln!("dough: the event stream dropped; reopening from byte {seen}");
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
