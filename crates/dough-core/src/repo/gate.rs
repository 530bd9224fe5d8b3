//! **The gate**: what a task's bundle must satisfy before the host pushes
//! it. The guest is untrusted; every rule is checked here, on the host, on
//! the bundle itself, in a bare repository of the gate's own that holds the
//! remote's base history.
//!
//! | rule | the bundle … |
//! |---|---|
//! | `bundle_size` | is at most `max_bundle_bytes` |
//! | `bundle_refs` | carries exactly one ref: `refs/heads/<task branch>` (no tags, no other branch) |
//! | `bundle_invalid` | is a readable git bundle whose objects are complete |
//! | `not_descendant` | has a tip that descends from the base commit the clone saw |
//! | `non_fast_forward` | fast-forwards the branch if it already exists on the remote (no force) |
//! | `commit_count` | adds at most `max_commits` commits |
//! | `protected_path` | touches no protected path in any commit (unless the task allows it) |
use std::path::Path;

use super::{host_git, output, Plan};

/// CI definitions a task may not change unless allowed: a pushed branch
/// could otherwise run code with the repository's CI secrets.
pub const DEFAULT_PROTECTED: &[&str] = &[
    ".github/workflows/**",
    ".github/actions/**",
    ".gitea/workflows/**",
    ".forgejo/workflows/**",
    ".gitlab-ci.yml",
    ".gitlab/ci/**",
    ".circleci/**",
    ".buildkite/**",
    ".travis.yml",
    ".drone.yml",
    ".woodpecker.yml",
    ".woodpecker/**",
    "azure-pipelines.yml",
    "bitbucket-pipelines.yml",
    "Jenkinsfile",
];

#[derive(Debug, Clone)]
pub struct GateConfig {
    pub max_bundle_bytes: u64,
    pub max_commits: u32,
    /// Glob patterns (`*` within a path segment, `**` any number of
    /// segments), relative to the repository root.
    pub protected: Vec<String>,
    /// This task may change protected paths.
    pub allow_protected: bool,
    /// Asked just before the push and again before the pull request.
    pub claim: ClaimCheck,
}

/// Whether the task's claim is still this node's: a node of a cluster
/// declared dead (its task settled `node_lost` by a peer) must not push
/// or open a pull request. `Err`: why not. Without one, always `Ok`.
#[derive(Clone, Default)]
pub struct ClaimCheck(Option<std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>>);

impl ClaimCheck {
    pub fn new(f: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> ClaimCheck {
        ClaimCheck(Some(std::sync::Arc::new(f)))
    }

    pub fn check(&self) -> Result<(), String> {
        self.0.as_ref().map_or(Ok(()), |f| f())
    }
}

impl std::fmt::Debug for ClaimCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ClaimCheck(..)"
        } else {
            "ClaimCheck(none)"
        })
    }
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            max_bundle_bytes: super::DEFAULT_MAX_BUNDLE,
            max_commits: 500,
            protected: DEFAULT_PROTECTED.iter().map(|s| s.to_string()).collect(),
            allow_protected: false,
            claim: ClaimCheck::default(),
        }
    }
}

impl GateConfig {
    /// Apply `DOUGH_PROTECTED_PATHS` (comma-separated globs; empty: none),
    /// `DOUGH_MAX_BUNDLE_MIB` and `DOUGH_MAX_COMMITS`.
    pub fn from_env() -> Result<GateConfig, String> {
        let mut g = GateConfig::default();
        if let Ok(v) = std::env::var("DOUGH_PROTECTED_PATHS") {
            g.protected = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Ok(v) = std::env::var("DOUGH_MAX_BUNDLE_MIB") {
            let mib: u64 = v.parse().ok().filter(|m| *m >= 1).ok_or_else(|| {
                format!("DOUGH_MAX_BUNDLE_MIB={v:?}: expected a whole number ≥ 1")
            })?;
            g.max_bundle_bytes = mib << 20;
        }
        if let Ok(v) = std::env::var("DOUGH_MAX_COMMITS") {
            g.max_commits =
                v.parse().ok().filter(|m| *m >= 1).ok_or_else(|| {
                    format!("DOUGH_MAX_COMMITS={v:?}: expected a whole number ≥ 1")
                })?;
        }
        Ok(g)
    }
}

/// A broken rule, named.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("rule {rule}: {detail}")]
pub struct GateError {
    pub rule: &'static str,
    pub detail: String,
}

impl GateError {
    pub fn new(rule: &'static str, detail: impl Into<String>) -> GateError {
        GateError {
            rule,
            detail: detail.into(),
        }
    }
}

/// What passed the gate.
#[derive(Debug, Clone)]
pub struct Checked {
    pub head: String,
    /// Oldest first.
    pub commits: Vec<super::Commit>,
}

/// The ref the gate keeps the checked tip under, in its repository.
const CHECKED_REF: &str = "refs/dough/checked";

/// Check the bundle at `bundle` against every rule. `repo` is made here
/// (a bare repository) and holds the checked tip for [`push`] afterwards.
pub fn check(
    cfg: &GateConfig,
    plan: &Plan,
    bundle: &Path,
    received: u64,
    oversized: bool,
    repo: &Path,
    cred: Option<(&str, &str)>,
) -> Result<Checked, GateError> {
    let size = std::fs::metadata(bundle).map(|m| m.len()).unwrap_or(0);
    if oversized || received > cfg.max_bundle_bytes || size > cfg.max_bundle_bytes {
        return Err(GateError::new(
            "bundle_size",
            format!(
                "the bundle is {} bytes; the limit is {}",
                received.max(size),
                cfg.max_bundle_bytes
            ),
        ));
    }
    let git = |args: &[&str]| {
        let mut c = host_git(None);
        c.arg("--git-dir").arg(repo).args(args);
        output(c)
    };
    let host = |e: String| GateError::new("host", e);
    std::fs::create_dir_all(repo).map_err(|e| host(format!("create {}: {e}", repo.display())))?;
    let mut init = host_git(None);
    init.args(["init", "--quiet", "--bare"]).arg(repo);
    output(init).map_err(host)?;

    // One ref, the task's branch.
    let b = bundle.to_string_lossy().to_string();
    let heads = git(&["bundle", "list-heads", &b])
        .map_err(|e| GateError::new("bundle_invalid", format!("not a git bundle: {e}")))?;
    let want = format!("refs/heads/{}", plan.branch);
    let refs: Vec<(&str, &str)> = heads.lines().filter_map(|l| l.split_once(' ')).collect();
    match refs.as_slice() {
        [(_, r)] if *r == want => {}
        _ => {
            let names: Vec<&str> = refs.iter().map(|(_, r)| *r).collect();
            return Err(GateError::new(
                "bundle_refs",
                format!(
                    "the bundle must carry exactly {want}; it carries [{}]",
                    names.join(", ")
                ),
            ));
        }
    }

    // The remote's base history (and the branch, if it exists), with the
    // host's credential.
    let mut refspecs = vec![format!("+refs/heads/{}:refs/dough/base", plan.base_branch)];
    if plan.branch_exists.is_some() {
        refspecs.push(format!(
            "+refs/heads/{}:refs/dough/remote-branch",
            plan.branch
        ));
    }
    let mut fetch = host_git(cred);
    fetch
        .arg("--git-dir")
        .arg(repo)
        .args(["fetch", "--quiet", "--no-tags", "--", &plan.url])
        .args(&refspecs);
    output(fetch).map_err(|e| host(format!("fetch the base from {}: {e}", plan.url)))?;
    if git(&[
        "cat-file",
        "-e",
        &format!("{}^{{commit}}", plan.base_commit),
    ])
    .is_err()
    {
        return Err(GateError::new(
            "not_descendant",
            format!(
                "the base commit {} is no longer on {} (was the base branch rewritten?)",
                plan.base_commit, plan.base_branch
            ),
        ));
    }
    if let Err(e) = git(&["bundle", "verify", &b]) {
        let rule = if e.contains("prerequisite") {
            "not_descendant"
        } else {
            "bundle_invalid"
        };
        return Err(GateError::new(rule, format!("git bundle verify: {e}")));
    }
    git(&[
        "fetch",
        "--quiet",
        "--no-tags",
        &b,
        &format!("{want}:{CHECKED_REF}"),
    ])
    .map_err(|e| GateError::new("bundle_invalid", format!("unpack the bundle: {e}")))?;
    let head = git(&[
        "rev-parse",
        "--verify",
        &format!("{CHECKED_REF}^{{commit}}"),
    ])
    .map_err(|e| GateError::new("bundle_invalid", e))?
    .trim()
    .to_string();
    if git(&["merge-base", "--is-ancestor", &plan.base_commit, &head]).is_err() {
        return Err(GateError::new(
            "not_descendant",
            format!(
                "{head} does not descend from the base commit {} of {}",
                plan.base_commit, plan.base_branch
            ),
        ));
    }
    if let Some(existing) = &plan.branch_exists {
        if git(&["merge-base", "--is-ancestor", existing, &head]).is_err() {
            return Err(GateError::new(
                "non_fast_forward",
                format!(
                    "{} exists on the remote at {existing} and the work does not build on it (no force pushes)",
                    plan.branch
                ),
            ));
        }
    }
    let range = format!("{}..{head}", plan.base_commit);
    let log = git(&["log", "--reverse", "--format=%H%x09%s", &range]).map_err(host)?;
    let commits: Vec<super::Commit> = log
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(h, s)| super::Commit {
            sha: h.to_string(),
            subject: s.to_string(),
        })
        .collect();
    if commits.len() > cfg.max_commits as usize {
        return Err(GateError::new(
            "commit_count",
            format!(
                "{} commits on the branch; the limit is {}",
                commits.len(),
                cfg.max_commits
            ),
        ));
    }
    if !cfg.allow_protected && !cfg.protected.is_empty() {
        // Every path any commit touched (merges against each parent).
        let names = git(&[
            "log",
            "--format=",
            "--name-only",
            "--no-renames",
            "-m",
            &range,
        ])
        .map_err(host)?;
        let mut hits: Vec<String> = vec![];
        for path in names.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(p) = cfg.protected.iter().find(|p| glob_match(p, path)) {
                let hit = format!("{path} (matches {p})");
                if !hits.contains(&hit) {
                    hits.push(hit);
                }
            }
        }
        if !hits.is_empty() {
            return Err(GateError::new(
                "protected_path",
                format!("the task changed protected paths: {}", hits.join(", ")),
            ));
        }
    }
    Ok(Checked { head, commits })
}

/// Push the checked tip to the task's branch: never forced, no tags.
pub fn push(plan: &Plan, repo: &Path, cred: Option<(&str, &str)>) -> Result<(), String> {
    let mut c = host_git(cred);
    c.arg("--git-dir")
        .arg(repo)
        .args(["push", "--quiet", "--no-verify", "--", &plan.url])
        .arg(format!("{CHECKED_REF}:refs/heads/{}", plan.branch));
    output(c).map(|_| ())
}

/// `*` matches within one path segment, `**` any number of segments
/// (including none), everything else literally.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    match_segs(&p, &s)
}

fn match_segs(p: &[&str], s: &[&str]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((&"**", rest)) => (0..=s.len()).any(|i| match_segs(rest, &s[i..])),
        Some((first, rest)) => {
            !s.is_empty()
                && match_seg(first.as_bytes(), s[0].as_bytes())
                && match_segs(rest, &s[1..])
        }
    }
}

fn match_seg(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| match_seg(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && match_seg(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let yes = [
            (".github/workflows/**", ".github/workflows/ci.yml"),
            (".github/workflows/**", ".github/workflows/sub/x.yaml"),
            ("Jenkinsfile", "Jenkinsfile"),
            ("**/Jenkinsfile", "a/b/Jenkinsfile"),
            ("**/Jenkinsfile", "Jenkinsfile"),
            ("*.yml", "x.yml"),
            ("docs/*.md", "docs/a.md"),
        ];
        for (p, s) in yes {
            assert!(glob_match(p, s), "{p} should match {s}");
        }
        let no = [
            (".github/workflows/**", ".github/CODEOWNERS"),
            (".github/workflows/**", "x/.github/workflows/ci.yml"),
            ("Jenkinsfile", "src/Jenkinsfile"),
            ("*.yml", "a/x.yml"),
            ("docs/*.md", "docs/a/b.md"),
        ];
        for (p, s) in no {
            assert!(!glob_match(p, s), "{p} should not match {s}");
        }
    }
}
