//! Tier 2, end to end with a real coding agent: Claude Code (the
//! `claude-code` preset, its CLI installed from the npm registry into
//! `agent-claude-code` by `dough image build --agent`) runs as a repository
//! task in a real VM. It clones from a real git server on the tests'
//! "internet", talks to a stand-in for Anthropic's Messages API there
//! (`modelapi`: no model can run here; a test double that speaks the wire
//! format, streaming included), edits the repository with its own tools,
//! and Dough commits, gates, pushes and opens the pull request (the forge is
//! the stand-in of `gitserver`). The egress policy is the preset's
//! allowlist: the model API and the repository, nothing else.
//!
//! The image is built once per machine (`scripts/test.sh` builds it in the
//! machine's state directory; this test shares that layer store, so here
//! every step is normally cached).
mod common;
mod gitserver;
mod modelapi;
#[path = "../../dough-net/tests/world/mod.rs"]
mod world;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Output};

use common::*;
use gitserver::*;
use modelapi::*;
use world::*;

const GIT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const GIT_PORT: u16 = 8000;
const FORGE_PORT: u16 = 8080;
const MODEL_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
const MODEL_PORT: u16 = 8443;
const GIT_TOKEN: &str = "git-token-e2e";
/// Two halves, so that nothing in the guest holds the whole key unless
/// Dough or the agent put it there.
const KEY_A: &str = "sk-ant-e2e-";
const KEY_B: &str = "4b1d9c07aa";

fn key() -> String {
    format!("{KEY_A}{KEY_B}")
}

const README: &str = "# calc\n\nA tiny calculator.\n\nStatus: the sum is wrong.\n";

/// Builds the preset's image in this test's state directory over the
/// machine's layer store (cached after `scripts/test.sh`).
fn build_image(h: &Harness) {
    let images = h.state.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let shared = image_dir().parent().unwrap().join(dough_image::LAYER_STORE);
    std::fs::create_dir_all(&shared).unwrap();
    std::os::unix::fs::symlink(&shared, images.join(dough_image::LAYER_STORE)).unwrap();
    let b = h
        .cmd()
        .args(["image", "build", "--agent", "claude-code"])
        .output()
        .unwrap();
    eprintln!("image build:\n{}", text(&b.stderr));
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stderr));
}

struct Env {
    h: Harness,
    w: World,
    git: GitServer,
    forge: ForgeDouble,
    model: ModelApi,
}

impl Env {
    fn url(&self, repo: &str) -> String {
        format!("http://{GIT_ADDR}:{GIT_PORT}/git/{repo}.git")
    }

    /// `dough run --agent claude-code` in the test host with the key in
    /// its environment.
    fn run(&self, key: &str, args: &[&str]) -> Output {
        let mut c: Command = self.h.cmd();
        in_netns(&mut c, &self.w.host);
        c.env("DOUGH_DNS", DNS.to_string())
            .env("DOUGH_HOST_NAT", "0")
            .env("DOUGH_GIT_USER", GIT_USER)
            .env("DOUGH_GIT_TOKEN", GIT_TOKEN)
            .env("DOUGH_FORGE_TOKEN", "forge-secret-e2e")
            .env("ANTHROPIC_API_KEY", key)
            .args([
                "run",
                "--agent",
                "claude-code",
                "--model-url",
                &format!("http://{MODEL_ADDR}:{MODEL_PORT}"),
                "--forge-api",
                &format!("http://{GIT_ADDR}:{FORGE_PORT}"),
                "--timings",
            ])
            .args(args);
        c.output().unwrap()
    }
}

fn setup(tag: &str, script: Script) -> Env {
    let h = Harness::new();
    build_image(&h);
    let w = World::new(tag);
    for a in [GIT_ADDR, MODEL_ADDR] {
        sh(&[
            "ip",
            "-n",
            &w.inet,
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "lo",
        ]);
    }
    let git = GitServer::start(&w.inet, GIT_PORT, GIT_TOKEN);
    let forge = ForgeDouble::start(&w.inet, SocketAddr::new(GIT_ADDR.into(), FORGE_PORT));
    let model = ModelApi::start(
        &w.inet,
        SocketAddr::new(MODEL_ADDR.into(), MODEL_PORT),
        &key(),
        script,
    );
    Env {
        h,
        w,
        git,
        forge,
        model,
    }
}

/// The preset's own command line, then (as root, so it can look
/// everywhere) a search for the key in every file written since boot on
/// every file system the task can write, and on the raw scratch disk.
const CLAUDE_THEN_SEARCH: &str = r#"
t0=$(date +%s)
claude -p "$(cat "$DOUGH_PROMPT_FILE")" --permission-mode acceptEdits
rc=$?
echo "claude ran $(( $(date +%s) - t0 )) s"
sync
boot=$(( $(date +%s) - $(cut -d. -f1 /proc/uptime) - 2 ))
mkdir -p /mnt/pat && mount -t tmpfs none /mnt/pat
printf '%s' "$KEY_A$KEY_B" > /mnt/pat/key
for m in $(awk '$3 !~ /^(proc|sysfs|devpts|cgroup2?|mqueue|securityfs|debugfs|tracefs|bpf|configfs|pstore|fusectl|autofs|devtmpfs)$/ {print $2}' /proc/mounts | grep -v '^/mnt/pat$'); do
  find "$m" -xdev -type f -newermt "@$boot" 2>/dev/null
done | sort -u > /mnt/pat/files
files=$(xargs -d '\n' -r grep -lsF -f /mnt/pat/key < /mnt/pat/files 2>/dev/null | wc -l)
disk=$(grep -caF -f /mnt/pat/key /dev/vdb)
echo "key search: files=$files disk=$disk of $(wc -l < /mnt/pat/files) files"
# The search can find it: the agent's own environment holds it.
echo "key in claude's env: $(printf '%s' "$ANTHROPIC_API_KEY" | grep -cF -f /mnt/pat/key)"
echo "searched in $(( $(date +%s) - t0 )) s"
exit $rc
"#;

/// The whole path: prompt in, the agent reads the file and edits it with
/// its own tools against the scripted "model", Dough commits the edit,
/// gates it, pushes the branch and opens a pull request whose diff is the
/// scripted edit. The prompt reached the model API with the key; the key
/// is on no disk in the guest.
#[test]
fn claude_code_edits_a_repository_and_dough_opens_the_pull_request() {
    let e = setup(
        "cc",
        Script::Edit {
            file: "README.md".into(),
            old: "Status: the sum is wrong.".into(),
            new: "Status: the sum is right.".into(),
            done: "I fixed the status line.".into(),
        },
    );
    let base = e.git.make_repo("calc", &[("README.md", README)]);
    let out = e.run(
        &key(),
        &[
            "--root",
            "--disk",
            "512",
            "--repo",
            &e.url("calc"),
            "--branch",
            "dough/fix-status",
            "--prompt",
            "Fix the status line in README.md",
            "--pr-title",
            "Fix the status line",
            "-e",
            &format!("KEY_A={KEY_A}"),
            "-e",
            &format!("KEY_B={KEY_B}"),
            "--",
            "sh",
            "-c",
            CLAUDE_THEN_SEARCH,
        ],
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    let log = e.model.take();
    eprintln!(
        "stdout:\n{stdout}\nstderr:\n{stderr}\nmodel API saw {} requests",
        log.len()
    );
    for r in &log {
        eprintln!(
            "  {:?} {} {} main_loop={} {}",
            r.at.elapsed(),
            r.method,
            r.path,
            r.is_main_loop(),
            r.body["model"]
        );
    }
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("I fixed the status line."), "{stdout}");
    // --timings: each phase of a repository task, in order.
    let t = stderr
        .lines()
        .find(|l| l.starts_with("dough: timings: "))
        .unwrap_or_else(|| panic!("{stderr}"));
    let names: Vec<&str> = t["dough: timings: ".len()..]
        .split(" · ")
        .map(|p| p.rsplitn(3, ' ').nth(2).unwrap_or(p))
        .collect();
    assert_eq!(
        names,
        [
            "host set-up",
            "boot",
            "clone",
            "start",
            "task",
            "teardown",
            "gate, push, pr",
            "total"
        ],
        "{t}"
    );

    // The model API: the prompt arrived, with the key, and the agent sent
    // back what its Read tool found in the clone.
    let main: Vec<&ModelRequest> = log.iter().filter(|r| r.is_main_loop()).collect();
    assert!(main.len() >= 3, "read, edit, done: {log:?}");
    assert!(main
        .iter()
        .all(|r| r.header("x-api-key") == Some(key().as_str())));
    assert!(
        main[0]
            .user_text()
            .contains("Fix the status line in README.md"),
        "the prompt reached the model: {}",
        main[0].user_text()
    );
    assert!(
        main[1].user_text().contains("A tiny calculator."),
        "the agent read the cloned file: {}",
        main[1].user_text()
    );

    // No key on any disk; the search itself works.
    let found = stdout
        .lines()
        .find(|l| l.starts_with("key search:"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        found.starts_with("key search: files=0 disk=0 of "),
        "{found}"
    );
    assert!(stdout.contains("key in claude's env: 1"), "{stdout}");

    // The branch: one commit by Dough holding exactly the scripted edit.
    let tip = e
        .git
        .branches("calc")
        .into_iter()
        .find(|(b, _)| b == "dough/fix-status")
        .unwrap_or_else(|| panic!("branch not pushed:\n{stderr}"))
        .1;
    let repo = e.git.repo_path("calc");
    let diff = git(&repo, &["diff", &base, &tip]);
    let changed: Vec<&str> = diff
        .lines()
        .filter(|l| {
            (l.starts_with('+') || l.starts_with('-'))
                && !l.starts_with("+++")
                && !l.starts_with("---")
        })
        .collect();
    assert_eq!(
        changed,
        ["-Status: the sum is wrong.", "+Status: the sum is right."],
        "{diff}"
    );
    assert_eq!(
        git(&repo, &["diff", "--name-only", &base, &tip]),
        "README.md"
    );

    // The pull request.
    let reqs = e.forge.taken();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].body["head"], "dough/fix-status");
    assert_eq!(reqs[0].body["title"], "Fix the status line");
    assert_eq!(
        stdout.lines().last(),
        Some("http://forge.example/pulls/1"),
        "{stdout}"
    );
    e.h.assert_clean();
}

fn no_branch_but_main(e: &Env, repo: &str) {
    let b = e.git.branches(repo);
    assert_eq!(b.len(), 1, "nothing may be pushed: {b:?}");
}

/// What a user meets first: a key the model API refuses (401), an agent
/// with nothing to change, a provider that never answers. Each ends with a
/// clear reason, nothing pushed, and nothing of the VM left.
#[test]
fn a_refused_key_a_task_without_changes_and_a_hung_provider_are_clear() {
    let e = setup(
        "cf",
        Script::Reply("Nothing to do: README.md is already right.".into()),
    );
    e.git.make_repo("calc", &[("README.md", README)]);

    // 401: the agent says so and fails; Dough pushes nothing. (Claude Code
    // retries a refused key about ten times over some three minutes;
    // CLAUDE_CODE_MAX_RETRIES shortens that, as docs/agents.md says.)
    let out = e.run(
        "sk-ant-wrong",
        &[
            "--repo",
            &e.url("calc"),
            "--prompt",
            "Fix the status line",
            "-e",
            "CLAUDE_CODE_MAX_RETRIES=1",
        ],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let log = e.model.take();
    eprintln!(
        "401: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for r in &log {
        eprintln!("  {:?} ago: {} {}", r.at.elapsed(), r.method, r.path);
    }
    assert!(!log.is_empty(), "the agent reached the model API");
    assert!(log
        .iter()
        .all(|r| r.header("x-api-key") == Some("sk-ant-wrong")));
    assert_ne!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let said = format!("{stdout}{stderr}").to_lowercase();
    assert!(
        said.contains("api key") || said.contains("401"),
        "the agent names the refused key:\n{said}"
    );
    assert!(stderr.contains("nothing was pushed"), "{stderr}");
    no_branch_but_main(&e, "calc");
    assert!(e.forge.taken().is_empty());
    e.h.assert_clean();

    // The model answers without a tool call: success, "nothing to do".
    let out = e.run(
        &key(),
        &["--repo", &e.url("calc"), "--prompt", "Fix the status line"],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!("no change:\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("Nothing to do: README.md is already right."),
        "{stdout}"
    );
    assert!(
        stderr.contains("nothing to do: the task changed nothing"),
        "{stderr}"
    );
    assert!(e
        .model
        .take()
        .iter()
        .any(|r| r.is_main_loop() && r.user_text().contains("Fix the status line")));
    no_branch_but_main(&e, "calc");
    assert!(e.forge.taken().is_empty());
    e.h.assert_clean();

    // A provider that never answers: the task's timeout ends it.
    e.model.set_script(Script::Stall);
    let out = e.run(
        &key(),
        &[
            "--repo",
            &e.url("calc"),
            "--prompt",
            "Fix the status line",
            "--timeout",
            "45",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(stderr.contains("timed out after 45 s"), "{stderr}");
    no_branch_but_main(&e, "calc");
    assert!(e.forge.taken().is_empty());
    e.h.assert_clean();
}

/// The agent edits, then fails (the model API answers 400, which it does
/// not retry): by default nothing of the half-done work is pushed and
/// Dough says what was left and why; with `--push-partial` the edit goes to
/// the branch through the gate, and no pull request is opened.
#[test]
fn a_failure_after_partial_edits_pushes_nothing_unless_asked() {
    let e = setup(
        "cp",
        Script::EditThenError {
            file: "README.md".into(),
            old: "Status: the sum is wrong.".into(),
            new: "Status: half done.".into(),
        },
    );
    let base = e.git.make_repo("calc", &[("README.md", README)]);
    let args = [
        "--repo",
        &e.url("calc"),
        "--branch",
        "dough/partial",
        "--prompt",
        "Fix the status line",
    ];

    let out = e.run(&key(), &args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!(
        "partial: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let code = out.status.code().expect("an exit code");
    assert!(
        code != 0 && code < 124,
        "the agent's own failure: {code}\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("the task exited with code {code} after changing the repository (1 commit): nothing was pushed"))
            && stderr.contains("[partial_work]"),
        "{stderr}"
    );
    assert!(e.model.take().iter().filter(|r| r.is_main_loop()).count() >= 3);
    no_branch_but_main(&e, "calc");
    assert!(e.forge.taken().is_empty());
    e.h.assert_clean();

    let mut asked = args.to_vec();
    asked.push("--push-partial");
    let out = e.run(&key(), &asked);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "the task's code again:\n{stderr}"
    );
    assert!(
        stderr.contains("pushed as asked (--push-partial)"),
        "{stderr}"
    );
    let tip = e
        .git
        .branches("calc")
        .into_iter()
        .find(|(b, _)| b == "dough/partial")
        .unwrap_or_else(|| panic!("partial work pushed:\n{stderr}"))
        .1;
    assert_eq!(
        git(
            &e.git.repo_path("calc"),
            &["show", &format!("{tip}:README.md")]
        ),
        README.trim_end().replace("the sum is wrong.", "half done.")
    );
    let _ = base;
    assert!(
        e.forge.taken().is_empty(),
        "no pull request for a failed task"
    );
    e.h.assert_clean();
}
