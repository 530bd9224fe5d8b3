//! **Where a task's repository work becomes a branch and a pull request.**
//!
//! ```text
//! prepare (host): ls-remote → base branch + commit, public or private
//!   ─▶ VM: agent clones (read credential over vsock when private), task runs,
//!          agent commits, sends a bundle of base..branch over vsock
//!   ─▶ gate (host): one ref, the task's branch; descends from base; limits;
//!          protected paths                                   [gate.rs]
//!   ─▶ push with the host's credential ─▶ pull request       [forge.rs]
//! ```
//! The push credential (`DOUGH_GIT_TOKEN`) and the forge token
//! (`DOUGH_FORGE_TOKEN`) never enter the VM. A private repository's read
//! credential (`DOUGH_GIT_READ_TOKEN`, else `DOUGH_GIT_TOKEN`) does, for the
//! clone only (see the agent's `repo.rs`).
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

pub mod forge;
pub mod gate;

pub use forge::ForgeKind;
pub use gate::{ClaimCheck, GateConfig, GateError};

/// Default limit on the bundle a task may send back.
pub const DEFAULT_MAX_BUNDLE: u64 = 100 << 20;
/// Where the agent clones, when the task names no work directory.
pub const GUEST_REPO_DIR: &str = "/home/dough/work";

/// The repository part of a task request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct RepoRequest {
    /// `https://` (or `http://`) URL of the repository, without credentials.
    pub url: String,
    /// Branch to start from; default: the remote's default branch.
    #[serde(default)]
    pub base: Option<String>,
    /// Branch to push the work to; default `dough/<task id>`.
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub commit_message: Option<String>,
    /// Commit author, `Name <email>`; default `Dough <dough@localhost>`.
    #[serde(default)]
    pub author: Option<String>,
}

/// The pull request part of a task request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct PullRequestRequest {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub body: Option<String>,
    /// `github` (default) or `gitea` (also Forgejo).
    #[serde(default)]
    pub forge: Option<ForgeKind>,
    /// API base URL; default derived from the repository's host.
    #[serde(default)]
    pub api: Option<String>,
    /// Let the task change protected paths (CI definitions).
    #[serde(default)]
    pub allow_protected: bool,
    /// When the task fails (exits non-zero) after changing the repository,
    /// push what it left to the branch anyway (through the gate; no pull
    /// request). Off by default: half-done work does not reach review.
    #[serde(default)]
    pub push_partial: bool,
}

/// Host credentials, from the environment or the daemon's config; never
/// from a task.
#[derive(Clone, Default)]
pub struct Credentials {
    /// HTTP basic user for git (`DOUGH_GIT_USER`, default `x-access-token`,
    /// which GitHub and Gitea accept with a token).
    pub git_user: String,
    /// Push (and host-side fetch) token: `DOUGH_GIT_TOKEN`.
    pub git_token: Option<String>,
    /// Read token handed to the guest for private clones:
    /// `DOUGH_GIT_READ_TOKEN`, else the push token.
    pub read_token: Option<String>,
    /// Forge API token: `DOUGH_FORGE_TOKEN`.
    pub forge_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| if o.is_some() { "set" } else { "unset" };
        f.debug_struct("Credentials")
            .field("git_user", &self.git_user)
            .field("git_token", &set(&self.git_token))
            .field("read_token", &set(&self.read_token))
            .field("forge_token", &set(&self.forge_token))
            .finish()
    }
}

impl Credentials {
    pub fn from_env() -> Credentials {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let git_token = get("DOUGH_GIT_TOKEN");
        Credentials {
            git_user: get("DOUGH_GIT_USER").unwrap_or_else(|| "x-access-token".into()),
            read_token: get("DOUGH_GIT_READ_TOKEN").or_else(|| git_token.clone()),
            git_token,
            forge_token: get("DOUGH_FORGE_TOKEN"),
        }
    }
}

/// Why a repository task failed; `reason()` is the stored reason code.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot reach the repository {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the repository {url} refused the credential: {message}")]
    Auth { url: String, message: String },
    #[error("the base branch {branch} does not exist in {url}")]
    NoBase { url: String, branch: String },
    #[error("the guest could not clone the repository: {0}")]
    CloneFailed(String),
    #[error("the guest could not {stage} the task's work: {message}")]
    Work { stage: String, message: String },
    #[error("the guest sent no account of the task's work")]
    NoReport,
    #[error("the task exited with code {code} after changing the repository ({commits} commit{s}): nothing was pushed; a failed task's partial work is pushed only when asked (--push-partial), so half-done changes never reach review", s = if *commits == 1 { "" } else { "s" })]
    Partial { code: i32, commits: u32 },
    #[error("the gate rejected the task's work: {0}")]
    Gate(#[from] GateError),
    #[error("push of {branch} failed: {message}")]
    Push { branch: String, message: String },
    #[error("the pull request could not be opened: {0}")]
    PullRequest(String),
    #[error("{0}")]
    Host(String),
    /// This node no longer holds the task's claim: nothing more is
    /// published (see [`gate::ClaimCheck`]).
    #[error("not published: {0}")]
    ClaimLost(String),
}

impl RepoError {
    /// The stored failure reason; gate failures name their rule.
    pub fn reason(&self) -> String {
        match self {
            RepoError::Invalid(_) => "invalid".into(),
            RepoError::Unreachable { .. } => "repo_unreachable".into(),
            RepoError::Auth { .. } => "repo_auth".into(),
            RepoError::NoBase { .. } => "repo_no_base".into(),
            RepoError::CloneFailed(_) => "clone_failed".into(),
            RepoError::Work { .. } | RepoError::NoReport => "work_failed".into(),
            RepoError::Partial { .. } => "partial_work".into(),
            RepoError::Gate(g) => format!("gate:{}", g.rule),
            RepoError::Push { .. } => "push_failed".into(),
            RepoError::PullRequest(_) => "pr_failed".into(),
            RepoError::Host(_) => "host_error".into(),
            RepoError::ClaimLost(_) => "node_lost".into(),
        }
    }
}

/// A repository task, checked and resolved against the remote.
#[derive(Debug, Clone)]
pub struct Plan {
    pub url: String,
    pub base_branch: String,
    pub base_commit: String,
    pub branch: String,
    /// The branch already exists on the remote at this commit (the work
    /// must then fast-forward it).
    pub branch_exists: Option<String>,
    /// The remote refused anonymous reads.
    pub private: bool,
    pub author_name: String,
    pub author_email: String,
    pub commit_message: String,
    pub pr: PullRequestRequest,
}

/// Check a request before anything runs: URL, branch names, author.
pub fn validate(req: &RepoRequest) -> Result<(), String> {
    let url = req.url.trim();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("repo url {url:?}: only https:// and http:// URLs are supported"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!(
            "repo url {url:?} carries credentials; give them to the host as DOUGH_GIT_TOKEN instead"
        ));
    }
    if authority.is_empty() || rest.split('/').filter(|s| !s.is_empty()).count() < 2 {
        return Err(format!(
            "repo url {url:?} names no repository (https://HOST/OWNER/REPO)"
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("repo url {url:?} holds whitespace"));
    }
    for (what, b) in [("base", &req.base), ("branch", &req.branch)] {
        if let Some(b) = b {
            check_branch(b).map_err(|e| format!("{what} branch {b:?}: {e}"))?;
        }
    }
    if let Some(a) = &req.author {
        parse_author(a)?;
    }
    if let Some(m) = &req.commit_message {
        if m.trim().is_empty() {
            return Err("commit message is empty".into());
        }
    }
    Ok(())
}

/// Check the pull request part of a request.
pub fn validate_pull_request(pr: &PullRequestRequest) -> Result<(), String> {
    match &pr.api {
        Some(api) if !api.starts_with("https://") && !api.starts_with("http://") => {
            Err(format!("api {api:?} is not an http(s) URL"))
        }
        _ => Ok(()),
    }
}

/// A branch name git and forges accept (a subset of `git check-ref-format`).
pub fn check_branch(b: &str) -> Result<(), &'static str> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._/-+".contains(c);
    if b.is_empty() || b.len() > 200 {
        return Err("must be 1 to 200 characters");
    }
    if !b.chars().all(ok_char) {
        return Err("may hold only letters, digits and . _ / - +");
    }
    if b.starts_with(['-', '/', '.'])
        || b.ends_with(['/', '.'])
        || b.ends_with(".lock")
        || b.contains("..")
        || b.contains("//")
        || b.contains("/.")
        || b == "HEAD"
    {
        return Err("is not a valid git branch name");
    }
    Ok(())
}

fn parse_author(a: &str) -> Result<(String, String), String> {
    let bad = || format!("author {a:?}: expected `Name <email>`");
    let (name, rest) = a.split_once('<').ok_or_else(bad)?;
    let email = rest.strip_suffix('>').ok_or_else(bad)?;
    let name = name.trim();
    if name.is_empty() || email.is_empty() || email.contains(['<', '>']) || a.contains('\n') {
        return Err(bad());
    }
    Ok((name.to_string(), email.trim().to_string()))
}

/// The task's branch when none was asked for.
pub fn default_branch(task_id: &str) -> String {
    format!("dough/{task_id}")
}

/// A git command on the host: no system or global config, no prompts, the
/// credential (if any) as a header in git's own environment.
pub(crate) fn host_git(cred: Option<(&str, &str)>) -> Command {
    let mut c = Command::new("git");
    c.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_ASKPASS", "/bin/false")
        .env_remove("GIT_DIR")
        .stdin(std::process::Stdio::null());
    // A remote that stalls is given up after a minute below 1 KB/s.
    c.env("GIT_CONFIG_KEY_0", "http.lowSpeedLimit")
        .env("GIT_CONFIG_VALUE_0", "1000")
        .env("GIT_CONFIG_KEY_1", "http.lowSpeedTime")
        .env("GIT_CONFIG_VALUE_1", "60");
    if let Some((user, token)) = cred {
        c.env("GIT_CONFIG_COUNT", "3")
            .env("GIT_CONFIG_KEY_2", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_2",
                format!(
                    "Authorization: Basic {}",
                    base64(&format!("{user}:{token}"))
                ),
            );
    } else {
        c.env("GIT_CONFIG_COUNT", "2");
    }
    c
}

/// Run; Ok(stdout) or Err(git's last meaningful stderr line).
pub(crate) fn output(mut c: Command) -> Result<String, String> {
    let o = c.output().map_err(|e| format!("cannot run git: {e}"))?;
    if o.status.success() {
        return Ok(String::from_utf8_lossy(&o.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&o.stderr);
    let msg = err
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("hint:"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(if msg.is_empty() {
        format!("git exited with {}", o.status)
    } else {
        msg
    })
}

fn is_auth_failure(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("authentication failed")
        || m.contains("could not read username")
        || m.contains("401")
        || m.contains("403")
        || m.contains("terminal prompts disabled")
}

struct Remote {
    head_symref: Option<String>,
    refs: Vec<(String, String)>,
}

fn ls_remote(url: &str, cred: Option<(&str, &str)>) -> Result<Remote, String> {
    let mut c = host_git(cred);
    c.args(["ls-remote", "--symref", "--", url]);
    let out = output(c)?;
    let mut r = Remote {
        head_symref: None,
        refs: vec![],
    };
    for l in out.lines() {
        if let Some(rest) = l.strip_prefix("ref: ") {
            if let Some((target, "HEAD")) = rest.split_once('\t') {
                r.head_symref = target.strip_prefix("refs/heads/").map(str::to_string);
            }
        } else if let Some((sha, name)) = l.split_once('\t') {
            r.refs.push((name.to_string(), sha.to_string()));
        }
    }
    Ok(r)
}

/// Resolve the request against the remote (blocking: runs git). Tries an
/// anonymous read first; a remote that refuses it is private, and is read
/// with the host's token.
pub fn prepare(
    req: &RepoRequest,
    pr: &PullRequestRequest,
    task_id: &str,
    creds: &Credentials,
) -> Result<Plan, RepoError> {
    validate(req).map_err(RepoError::Invalid)?;
    let url = req.url.trim().to_string();
    let (remote, private) = match ls_remote(&url, None) {
        Ok(r) => (r, false),
        Err(e) if is_auth_failure(&e) => {
            let Some(token) = creds.read_token.as_deref() else {
                return Err(RepoError::Auth {
                    url,
                    message: format!(
                        "{e} (the repository needs a credential: set DOUGH_GIT_TOKEN or DOUGH_GIT_READ_TOKEN on the host)"
                    ),
                });
            };
            match ls_remote(&url, Some((&creds.git_user, token))) {
                Ok(r) => (r, true),
                Err(e) if is_auth_failure(&e) => return Err(RepoError::Auth { url, message: e }),
                Err(e) => return Err(RepoError::Unreachable { url, message: e }),
            }
        }
        Err(e) => return Err(RepoError::Unreachable { url, message: e }),
    };
    let base_branch = match &req.base {
        Some(b) => b.clone(),
        None => remote
            .head_symref
            .clone()
            .ok_or_else(|| RepoError::Unreachable {
                url: url.clone(),
                message: "the remote names no default branch (HEAD); give --base".into(),
            })?,
    };
    let find = |b: &str| {
        remote
            .refs
            .iter()
            .find(|(n, _)| n == &format!("refs/heads/{b}"))
            .map(|(_, s)| s.clone())
    };
    let base_commit = find(&base_branch).ok_or_else(|| RepoError::NoBase {
        url: url.clone(),
        branch: base_branch.clone(),
    })?;
    let branch = req
        .branch
        .clone()
        .unwrap_or_else(|| default_branch(task_id));
    if branch == base_branch {
        return Err(RepoError::Invalid(format!(
            "the work branch {branch} is the base branch; the work goes on a branch of its own"
        )));
    }
    let (author_name, author_email) = match &req.author {
        Some(a) => parse_author(a).map_err(RepoError::Invalid)?,
        None => ("Dough".to_string(), "dough@localhost".to_string()),
    };
    Ok(Plan {
        branch_exists: find(&branch),
        url,
        base_branch,
        base_commit,
        branch,
        private,
        author_name,
        author_email,
        commit_message: req
            .commit_message
            .clone()
            .unwrap_or_else(|| format!("Changes made by Dough task {task_id}")),
        pr: pr.clone(),
    })
}

impl Plan {
    /// What the agent gets in Assign; the read credential only when the
    /// repository is private.
    pub fn guest_work(
        &self,
        creds: &Credentials,
        dir: &str,
        max_bundle: u64,
    ) -> dough_proto::RepoWork {
        dough_proto::RepoWork {
            url: self.url.clone(),
            base_branch: self.base_branch.clone(),
            base_commit: self.base_commit.clone(),
            branch: self.branch.clone(),
            dir: dir.to_string(),
            credential: if self.private {
                creds
                    .read_token
                    .clone()
                    .map(|t| (creds.git_user.clone(), t))
            } else {
                None
            },
            author_name: self.author_name.clone(),
            author_email: self.author_email.clone(),
            commit_message: self.commit_message.clone(),
            max_bundle_bytes: max_bundle,
        }
    }

    /// The repository's host name (for an egress allowlist).
    pub fn host(&self) -> Option<String> {
        url_host(&self.url)
    }
}

pub(crate) fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    Some(host.to_string())
}

/// One commit of the pushed branch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Commit {
    pub sha: String,
    pub subject: String,
}

/// What became of the work.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Finalized {
    pub branch: String,
    pub base: String,
    pub base_commit: String,
    /// The pushed branch's commits, oldest first.
    pub commits: Vec<Commit>,
    pub head: Option<String>,
    pub pushed: bool,
    pub pr_url: Option<String>,
    /// Why there is no pull request ("nothing to do", no forge token, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The signed provenance statement, when it was made before the pull
    /// request (whose body carries its digest). Kept apart from the result.
    #[serde(skip)]
    pub provenance: Option<crate::provenance::Envelope>,
}

/// Facts for the pull request's body.
#[derive(Debug, Clone, Default)]
pub struct TaskFacts {
    pub task_id: String,
    pub image_digest: String,
    pub command: Vec<String>,
    /// The task failed with this exit code (its partial work is pushed as
    /// asked, and no pull request opened).
    pub failed_with: Option<i32>,
    /// What the task did on the network (the body lists it).
    pub egress: Option<dough_net::EgressRecord>,
    /// Signs the provenance statement (the body carries its digest).
    pub attest: Option<crate::provenance::Attestor>,
}

/// After the VM: gate the bundle, push, open the pull request (blocking).
/// `work_dir` is the task's host-side scratch (the bundle is in it).
pub fn finalize(
    plan: &Plan,
    work: &crate::supervisor::WorkOutput,
    bundle: &Path,
    work_dir: &Path,
    gate: &GateConfig,
    creds: &Credentials,
    facts: &TaskFacts,
) -> Result<Finalized, RepoError> {
    let mut fin = Finalized {
        branch: plan.branch.clone(),
        base: plan.base_branch.clone(),
        base_commit: plan.base_commit.clone(),
        ..Finalized::default()
    };
    match &work.report {
        None if work.oversized => {
            return Err(GateError::new(
                "bundle_size",
                format!(
                    "the bundle exceeds the limit of {} bytes",
                    gate.max_bundle_bytes
                ),
            )
            .into())
        }
        None => return Err(RepoError::NoReport),
        Some(dough_proto::Work::Failed { stage, message }) => {
            if message.contains("larger than the limit") {
                return Err(GateError::new("bundle_size", message.clone()).into());
            }
            return Err(RepoError::Work {
                stage: stage.clone(),
                message: message.clone(),
            });
        }
        Some(dough_proto::Work::NothingToDo) => {
            fin.note = Some("nothing to do: the task changed nothing".into());
            return Ok(fin);
        }
        Some(dough_proto::Work::Bundle { .. }) => {}
    }
    let cred = creds
        .git_token
        .as_deref()
        .map(|t| (creds.git_user.as_str(), t));
    let checked = gate::check(
        gate,
        plan,
        bundle,
        work.bundle_bytes,
        work.oversized,
        &work_dir.join("gate.git"),
        cred,
    )?;
    fin.head = Some(checked.head.clone());
    fin.commits = checked.commits.clone();
    gate.claim.check().map_err(RepoError::ClaimLost)?;
    gate::push(plan, &work_dir.join("gate.git"), cred).map_err(|message| RepoError::Push {
        branch: plan.branch.clone(),
        message,
    })?;
    fin.pushed = true;
    // Signed once the commits are pushed, while the bundle is at hand: the
    // pull request's body carries its digest.
    if let Some(a) = &facts.attest {
        let mut a = a.clone();
        a.facts.repo = Some(crate::provenance::RepoFacts {
            url: plan.url.clone(),
            base_branch: plan.base_branch.clone(),
            base_commit: plan.base_commit.clone(),
            branch: plan.branch.clone(),
            commits: fin.commits.iter().map(|c| c.sha.clone()).collect(),
            bundle_sha256: std::fs::read(bundle)
                .ok()
                .map(|b| crate::provenance::sha256_hex(&b)),
        });
        a.facts.outcome = match facts.failed_with {
            None => {
                serde_json::json!({"state": "succeeded", "reason": "exit_code", "exit_code": 0})
            }
            Some(code) => {
                serde_json::json!({"state": "failed", "reason": "exit_code", "exit_code": code})
            }
        };
        fin.provenance = Some(a.sign());
    }
    if let Some(code) = facts.failed_with {
        fin.note = Some(format!(
            "partial work of a failed task (exit code {code}) pushed as asked (--push-partial); no pull request is opened for it"
        ));
        return Ok(fin);
    }
    let Some(token) = creds.forge_token.as_deref() else {
        fin.note = Some("pushed; no DOUGH_FORGE_TOKEN, so no pull request was opened".into());
        return Ok(fin);
    };
    let digest = fin.provenance.as_ref().map(|e| e.digest());
    let body = forge::pr_body(plan, facts, &fin.commits, digest.as_deref());
    gate.claim.check().map_err(RepoError::ClaimLost)?;
    let url = forge::open_pull_request(plan, token, &body).map_err(RepoError::PullRequest)?;
    fin.pr_url = Some(url);
    Ok(fin)
}

/// A repository task's run: everything around the VM.
pub struct RepoRun {
    /// None: the task never reached a VM (the repository could not be
    /// resolved, or the request was bad).
    pub report: Option<crate::RunReport>,
    /// The repository's verdict: set when it decides the task's fate
    /// (prepare or clone failed, or the task exited 0 and its work was
    /// gated, pushed and proposed). None: the VM's outcome decides.
    pub work: Option<Result<Finalized, RepoError>>,
}

impl RepoRun {
    /// The VM's report with the repository's verdict, or the error that
    /// kept the task from reaching a VM.
    #[allow(clippy::type_complexity)]
    pub fn split(
        self,
    ) -> Result<(crate::RunReport, Option<Result<Finalized, RepoError>>), RepoError> {
        match (self.report, self.work) {
            (Some(rep), work) => Ok((rep, work)),
            (None, Some(Err(e))) => Err(e),
            (None, _) => Err(RepoError::Host("the task did not run".into())),
        }
    }
}

/// Resolve the repository, run the task on a clone of it, and turn what it
/// left into a branch and a pull request. Progress goes to `on_event`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    host: &crate::HostConfig,
    mut spec: crate::TaskSpec,
    req: &RepoRequest,
    pr: &PullRequestRequest,
    creds: &Credentials,
    gate: &GateConfig,
    vm: Option<crate::BootedVm>,
    on_event: &mut (dyn FnMut(crate::Event<'_>) + Send),
    cancel: impl std::future::Future<Output = i32>,
    attest: Option<crate::provenance::Attestor>,
) -> RepoRun {
    // A claimed VM the task cannot use is torn down before returning.
    let fail = |e, vm: Option<crate::BootedVm>| async move {
        if let Some(vm) = vm {
            vm.discard().await;
        }
        RepoRun {
            report: None,
            work: Some(Err(e)),
        }
    };
    on_event(crate::Event::Progress(&format!("resolving {}", req.url)));
    let (r, p, id, c) = (req.clone(), pr.clone(), spec.task_id.clone(), creds.clone());
    let plan = match tokio::task::spawn_blocking(move || prepare(&r, &p, &id, &c)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return fail(e, vm).await,
        Err(e) => return fail(RepoError::Host(format!("prepare: {e}")), vm).await,
    };
    on_event(crate::Event::Progress(&format!(
        "base {} at {}{}; work goes to {}",
        plan.base_branch,
        &plan.base_commit[..plan.base_commit.len().min(12)],
        if plan.private {
            " (private: the clone gets a read credential)"
        } else {
            ""
        },
        plan.branch
    )));
    let vm_id = match &vm {
        Some(vm) => vm.vm_id().to_string(),
        None => spec.vm_id.clone().unwrap_or_else(crate::new_id),
    };
    spec.vm_id = Some(vm_id.clone());
    let dir = match work_dir(host, &vm_id) {
        Ok(d) => d,
        Err(e) => {
            return fail(
                RepoError::Host(format!("create the work directory: {e}")),
                vm,
            )
            .await
        }
    };
    let guest_dir = spec
        .workdir
        .clone()
        .unwrap_or_else(|| GUEST_REPO_DIR.to_string());
    spec.repo = Some(plan.guest_work(creds, &guest_dir, gate.max_bundle_bytes));
    spec.bundle_path = Some(bundle_path(&dir.path));
    // An allowlist always lets the clone through: the repository's host by
    // name, or its address as a /32.
    if let (Some(dough_net::Egress::Allow { hosts, cidrs }), Some(h)) =
        (spec.network.as_mut(), plan.host())
    {
        match h.parse::<std::net::Ipv4Addr>() {
            Ok(addr) => {
                let c = dough_net::Cidr { addr, len: 32 };
                if !cidrs.contains(&c) {
                    cidrs.push(c);
                }
            }
            Err(_) if !hosts.contains(&h) => hosts.push(h),
            Err(_) => {}
        }
    }
    let image_digest = match &spec.image {
        Some(i) => i.manifest.digest.clone(),
        None => dough_image::Image::load(&host.image_dir)
            .map(|i| i.manifest.digest)
            .unwrap_or_default(),
    };
    let report = crate::run_task_in(host, &spec, vm, on_event, cancel).await;
    // A failed task that changed the repository: say so, and push what it
    // left only when asked.
    let partial = match (&report.result, &report.work.report) {
        (
            Ok(crate::Outcome::Exited(dough_proto::ExitStatus::Code(code))),
            Some(dough_proto::Work::Bundle { commits, .. }),
        ) if *code != 0 => Some((*code, *commits)),
        _ => None,
    };
    let work = match &report.result {
        Ok(crate::Outcome::CloneFailed(m)) => Some(Err(RepoError::CloneFailed(m.clone()))),
        Ok(crate::Outcome::Exited(_)) if partial.is_some() && !pr.push_partial => {
            let (code, commits) = partial.expect("checked");
            Some(Err(RepoError::Partial { code, commits }))
        }
        Ok(crate::Outcome::Exited(dough_proto::ExitStatus::Code(c)))
            if *c == 0 || partial.is_some() =>
        {
            on_event(crate::Event::Progress(if partial.is_some() {
                "the task failed after changing the repository; pushing its partial work as asked (--push-partial): gate, then push, no pull request"
            } else {
                "checking the work (gate), then push and pull request"
            }));
            let facts = TaskFacts {
                task_id: spec.task_id.clone(),
                image_digest,
                command: spec.command.clone(),
                failed_with: partial.map(|(code, _)| code),
                egress: report.egress.clone(),
                attest: attest.map(|mut a| {
                    a.ran(&report);
                    a
                }),
            };
            let (plan, out, path, wd, gate, creds) = (
                plan.clone(),
                report.work.clone(),
                bundle_path(&dir.path),
                dir.path.clone(),
                gate.clone(),
                creds.clone(),
            );
            Some(
                tokio::task::spawn_blocking(move || {
                    finalize(&plan, &out, &path, &wd, &gate, &creds, &facts)
                })
                .await
                .unwrap_or_else(|e| Err(RepoError::Host(format!("finalize: {e}")))),
            )
        }
        _ => None,
    };
    if let Err(e) = dir.remove() {
        tracing::warn!("remove {}: {e}", dir.path.display());
    }
    RepoRun {
        report: Some(report),
        work,
    }
}

/// The host-side scratch of a repo task (bundle, gate repository), with an
/// owner record so `gc` reclaims it after a crash.
pub fn work_dir(host: &crate::HostConfig, vm_id: &str) -> std::io::Result<crate::rundir::RunDir> {
    crate::rundir::RunDir::create(&host.work_dir(), vm_id)
}

/// The bundle's path inside a work dir.
pub fn bundle_path(dir: &Path) -> PathBuf {
    dir.join("work.bundle")
}

/// Standard base64 (for the HTTP basic header).
pub(crate) fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i), o, "{i}");
        }
    }

    #[test]
    fn requests_are_checked() {
        let ok = RepoRequest {
            url: "https://github.com/o/r.git".into(),
            ..Default::default()
        };
        assert!(validate(&ok).is_ok());
        let bad = [
            ("ssh://github.com/o/r", "only https"),
            ("https://user:pw@github.com/o/r", "carries credentials"),
            ("https://github.com/", "names no repository"),
            ("file:///tmp/r", "only https"),
        ];
        for (url, want) in bad {
            let r = RepoRequest {
                url: url.into(),
                ..Default::default()
            };
            let e = validate(&r).unwrap_err();
            assert!(e.contains(want), "{url}: {e}");
        }
        for b in [
            "", "-x", "a..b", "a.lock", "x/", "HEAD", "a b", "a~1", "a:b", ".hidden",
        ] {
            assert!(check_branch(b).is_err(), "{b:?} accepted");
        }
        for b in ["main", "dough/abc123", "feature/x-1.2", "v1+fix"] {
            assert!(check_branch(b).is_ok(), "{b:?} refused");
        }
        assert_eq!(
            parse_author("A B <a@b.c>").unwrap(),
            ("A B".into(), "a@b.c".into())
        );
        assert!(parse_author("nobody").is_err());
        assert_eq!(
            url_host("https://git.example:8443/o/r").as_deref(),
            Some("git.example")
        );
    }
}
