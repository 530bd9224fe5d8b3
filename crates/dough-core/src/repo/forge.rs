//! Opening the pull request through the forge's REST API, with the host's
//! `DOUGH_FORGE_TOKEN`.
//!
//! * GitHub: `POST {api}/repos/{owner}/{repo}/pulls`, `Authorization: Bearer`,
//!   API `https://api.github.com` for github.com, else `https://HOST/api/v3`
//!   (GitHub Enterprise Server).
//! * Gitea and Forgejo: `POST {api}/repos/{owner}/{repo}/pulls`,
//!   `Authorization: token`, API `https://HOST/api/v1`.
//!
//! Both take `{title, head, base, body}` and answer 201 with `html_url`.
use serde::{Deserialize, Serialize};

use super::{url_host, Plan, TaskFacts};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ForgeKind {
    #[default]
    Github,
    Gitea,
}

impl std::str::FromStr for ForgeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "github" => Ok(ForgeKind::Github),
            "gitea" | "forgejo" => Ok(ForgeKind::Gitea),
            _ => Err(format!("forge {s:?}: expected github or gitea")),
        }
    }
}

/// (owner, repo) from the repository URL's path.
pub fn owner_repo(url: &str) -> Option<(String, String)> {
    let path = url.split_once("://")?.1.split_once('/')?.1;
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let n = segs.len();
    if n < 2 {
        return None;
    }
    let repo = segs[n - 1].strip_suffix(".git").unwrap_or(segs[n - 1]);
    Some((segs[n - 2].to_string(), repo.to_string()))
}

/// The API base for the plan's repository.
pub fn api_base(plan: &Plan) -> Result<String, String> {
    if let Some(a) = &plan.pr.api {
        return Ok(a.trim_end_matches('/').to_string());
    }
    let host = url_host(&plan.url).ok_or("the repository URL names no host")?;
    let scheme = plan.url.split_once("://").map_or("https", |(s, _)| s);
    let authority = plan
        .url
        .split_once("://")
        .and_then(|(_, r)| r.split('/').next())
        .unwrap_or(&host);
    Ok(match plan.pr.forge.unwrap_or_default() {
        ForgeKind::Github if host == "github.com" => "https://api.github.com".into(),
        ForgeKind::Github => format!("{scheme}://{authority}/api/v3"),
        ForgeKind::Gitea => format!("{scheme}://{authority}/api/v1"),
    })
}

/// The pull request's body: the request's own text, then a record of the
/// task that made it.
pub fn pr_body(
    plan: &Plan,
    facts: &TaskFacts,
    commits: &[super::Commit],
    provenance: Option<&str>,
) -> String {
    let mut b = String::new();
    if let Some(body) = &plan.pr.body {
        b.push_str(body.trim_end());
        b.push_str("\n\n---\n");
    }
    b.push_str(&format!("Made by Dough task `{}`.\n\n", facts.task_id));
    b.push_str(&format!("- image: `{}`\n", facts.image_digest));
    b.push_str(&format!("- command: `{}`\n", shell_words(&facts.command)));
    b.push_str(&format!(
        "- base: `{}` at `{}`\n",
        plan.base_branch, plan.base_commit
    ));
    b.push_str(&format!("- commits ({}):\n", commits.len()));
    for c in commits {
        b.push_str(&format!(
            "  - `{}` {}\n",
            &c.sha[..c.sha.len().min(12)],
            c.subject
        ));
    }
    if let Some(rec) = &facts.egress {
        b.push_str(&egress_section(rec, &facts.task_id));
    }
    if let Some(d) = provenance {
        b.push_str(&format!(
            "\nProvenance: a statement signed by the Dough node (in-toto, SLSA provenance), `{d}`; \
             get it with `dough provenance {id} > {id}.json` and check it with `dough verify {id}.json`.\n",
            id = facts.task_id
        ));
    }
    b
}

/// Blocked destinations listed in the body at most (the record has all).
const BODY_BLOCKED_MAX: usize = 100;

/// The network section of the body: every host reached, with its bytes,
/// and every blocked attempt (up to [`BODY_BLOCKED_MAX`]).
pub fn egress_section(rec: &dough_net::EgressRecord, task_id: &str) -> String {
    let s = rec.summary();
    let mut b = format!("\n### Network ({} policy): {}\n\n", rec.policy, s.line());
    if !s.hosts.is_empty() {
        b.push_str("| host | connections | sent | received |\n|---|---:|---:|---:|\n");
        for h in &s.hosts {
            b.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                h.host,
                h.connections,
                bytes(h.bytes_out),
                bytes(h.bytes_in)
            ));
        }
    }
    let blocked: Vec<&dough_net::record::Flow> = rec
        .flows
        .iter()
        .filter(|f| f.verdict == dough_net::record::Verdict::Blocked)
        .collect();
    if !blocked.is_empty() {
        b.push_str(&format!("\n**Blocked** ({}):\n", blocked.len()));
        for f in blocked.iter().take(BODY_BLOCKED_MAX) {
            let dest = match f.port {
                Some(p) => format!("{}:{p}", f.addr),
                None => f.addr.to_string(),
            };
            let name = f
                .name
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            b.push_str(&format!(
                "- `{dest}`{name} {} × {}, by rule `{}`\n",
                f.proto,
                f.count,
                f.rule.as_deref().unwrap_or("?")
            ));
        }
        if blocked.len() > BODY_BLOCKED_MAX {
            b.push_str(&format!(
                "- … and {} more (`dough egress {task_id}`)\n",
                blocked.len() - BODY_BLOCKED_MAX,
            ));
        }
    }
    if !s.dns_refused.is_empty() {
        b.push_str(&format!(
            "\n**DNS refused**: {}\n",
            s.dns_refused
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    b
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 10 << 20 => format!("{} MiB", n >> 20),
        n if n >= 10 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
        .replace('`', "'")
}

/// Open the pull request; its web URL.
pub fn open_pull_request(plan: &Plan, token: &str, body: &str) -> Result<String, String> {
    let kind = plan.pr.forge.unwrap_or_default();
    let (owner, repo) = owner_repo(&plan.url).ok_or("the repository URL names no owner/repo")?;
    let url = format!("{}/repos/{owner}/{repo}/pulls", api_base(plan)?);
    let title = plan.pr.title.clone().unwrap_or_else(|| {
        plan.commit_message
            .lines()
            .next()
            .unwrap_or("Dough")
            .to_string()
    });
    let auth = match kind {
        ForgeKind::Github => format!("Bearer {token}"),
        ForgeKind::Gitea => format!("token {token}"),
    };
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("dough/", env!("CARGO_PKG_VERSION")))
        .build();
    let mut req = agent
        .post(&url)
        .set("Authorization", &auth)
        .set("Accept", "application/json");
    if kind == ForgeKind::Github {
        req = req
            .set("Accept", "application/vnd.github+json")
            .set("X-GitHub-Api-Version", "2022-11-28");
    }
    let payload = serde_json::json!({
        "title": title,
        "head": plan.branch,
        "base": plan.base_branch,
        "body": body,
    });
    match req.send_json(payload) {
        Ok(resp) => {
            let v: serde_json::Value = resp
                .into_json()
                .map_err(|e| format!("POST {url}: unreadable answer: {e}"))?;
            v.get("html_url")
                .and_then(|u| u.as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("POST {url}: the answer has no html_url"))
        }
        Err(ureq::Error::Status(code, resp)) => {
            let text = resp.into_string().unwrap_or_default();
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    v.get("message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| text.chars().take(200).collect());
            Err(format!("POST {url}: HTTP {code}: {msg}"))
        }
        Err(e) => Err(format!("POST {url}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_and_repo_from_urls() {
        assert_eq!(
            owner_repo("https://github.com/octo/hello.git"),
            Some(("octo".into(), "hello".into()))
        );
        assert_eq!(
            owner_repo("https://gitea.example/org/sub/proj/"),
            Some(("sub".into(), "proj".into()))
        );
        assert_eq!(owner_repo("https://github.com/"), None);
    }

    fn github_plan() -> Plan {
        Plan {
            url: "https://github.com/o/r".into(),
            base_branch: "main".into(),
            base_commit: "0".repeat(40),
            branch: "dough/x".into(),
            branch_exists: None,
            private: false,
            author_name: String::new(),
            author_email: String::new(),
            commit_message: "m".into(),
            pr: Default::default(),
        }
    }

    #[test]
    fn api_bases() {
        let mut plan = github_plan();
        assert_eq!(api_base(&plan).unwrap(), "https://api.github.com");
        plan.url = "https://ghe.corp:8443/o/r".into();
        assert_eq!(api_base(&plan).unwrap(), "https://ghe.corp:8443/api/v3");
        plan.pr.forge = Some(ForgeKind::Gitea);
        assert_eq!(api_base(&plan).unwrap(), "https://ghe.corp:8443/api/v1");
        plan.pr.api = Some("http://10.0.0.1:3000/api/v1/".into());
        assert_eq!(api_base(&plan).unwrap(), "http://10.0.0.1:3000/api/v1");
        let body = pr_body(
            &plan,
            &TaskFacts {
                task_id: "t1".into(),
                image_digest: "abc".into(),
                command: vec!["sh".into(), "-c".into(), "echo `hi`".into()],
                failed_with: None,
                egress: None,
                attest: None,
            },
            &[crate::repo::Commit {
                sha: "0123456789abcdef".into(),
                subject: "Add x".into(),
            }],
            None,
        );
        assert!(
            body.contains("task `t1`") && body.contains("`0123456789ab` Add x"),
            "{body}"
        );
        assert!(body.contains("command: `sh -c 'echo 'hi''`"), "{body}");
        assert!(!body.contains("Network") && !body.contains("Provenance"));
    }

    #[test]
    fn the_body_lists_hosts_reached_and_every_blocked_attempt() {
        use dough_net::record::{Recorder, Seen, Verdict};
        let mut r = Recorder::new("open", 1);
        r.dns("github.com", 1, true, &["140.82.112.3".parse().unwrap()], 2);
        r.dns("evil.test", 1, false, &[], 2);
        let seen = |addr: &str, port, verdict, out| Seen {
            proto: 6,
            addr: addr.parse().unwrap(),
            port: Some(port),
            verdict,
            rule: (verdict == Verdict::Blocked).then(|| "private4".to_string()),
            bytes_out: out,
            bytes_in: 3 * out,
            first_ms: 3,
            last_ms: 4,
        };
        r.flow(seen("140.82.112.3", 443, Verdict::Allowed, 20 << 10));
        r.flow(seen("10.0.0.5", 22, Verdict::Blocked, 0));
        r.flow(seen("10.0.0.5", 22, Verdict::Blocked, 0));
        let plan = github_plan();
        let facts = TaskFacts {
            task_id: "t9".into(),
            egress: Some(r.finish(5)),
            ..TaskFacts::default()
        };
        let body = pr_body(&plan, &facts, &[], Some("sha256:feed"));
        for want in [
            "### Network (open policy): reached 1 host, 1 blocked: 10.0.0.5:22, 1 DNS name refused",
            "| `github.com` | 1 | 20 KiB | 60 KiB |",
            "- `10.0.0.5:22` tcp × 2, by rule `private4`",
            "**DNS refused**: `evil.test`",
            "`sha256:feed`",
            "dough verify t9.json",
        ] {
            assert!(body.contains(want), "{want:?} missing from:\n{body}");
        }
    }
}
